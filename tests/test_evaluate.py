"""mode=eval: re-measuring a checkpoint reproduces the run's numbers and lands beside them."""

import pytest
import torch
from conftest import compose_config, tiny_run_overrides
from wandb_offline import offline_runs, read_offline_run, run_id_of

from lit_sharp.errors import ConfigError
from lit_sharp.results import read_results
from lit_sharp.train import run, run_dir_of

SPECS = "callbacks.sharpness.specs=[worst_linf_adaptive_rho0.001,average_l2_adaptive_rho0.1]"


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    overrides = tiny_run_overrides(synthetic_root, runs, SPECS, "trainer.max_steps=6")
    record = run(compose_config(*overrides))
    return overrides, record, run_dir_of(compose_config(*overrides))


def test_eval_of_a_run_checkpoint_reproduces_its_numbers(trained):
    overrides, record, run_dir = trained
    assert {"final/test_err", "c10c/err", "sharpness/worst_linf_adaptive_rho0.001"} <= set(record["metrics"])
    evaluated = run(compose_config(*overrides, "mode=eval", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"))
    assert evaluated["metrics"] == record["metrics"]
    on_disk = read_results(run_dir)
    assert on_disk["metrics"] == record["metrics"] and on_disk["run"]["status"] == "completed"
    assert on_disk["run"]["evaluated"]["ckpt_path"].endswith("last.ckpt")
    # The evaluation resumed the run's W&B id: a second offline folder of the same run carries the numbers.
    folders = offline_runs(run_dir)
    assert len(folders) == 2 and all(run_id_of(f) == record["run"]["wandb_id"] for f in folders)
    assert read_offline_run(folders[-1])["summary"]["c10c/err"] == record["metrics"]["c10c/err"]


def test_eval_with_more_radii_adds_them_beside_the_old_numbers(trained):
    overrides, record, run_dir = trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    run(compose_config(*overrides, "mode=eval", f"ckpt_path={ckpt}", "~callbacks.corruption", "~callbacks.final_errors",
                       "callbacks.sharpness.specs=[worst_linf_adaptive_rho0.002]"))
    metrics = read_results(run_dir)["metrics"]
    assert "sharpness/worst_linf_adaptive_rho0.002" in metrics
    assert metrics["final/test_err"] == record["metrics"]["final/test_err"]
    assert metrics["sharpness/worst_linf_adaptive_rho0.002"] >= metrics["sharpness/worst_linf_adaptive_rho0.001"]


def test_eval_of_a_plain_state_dict(trained, tmp_path):
    overrides, record, run_dir = trained
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    path = tmp_path / "weights.pt"
    torch.save(weights, path)
    evaluated = run(compose_config(*overrides, "mode=eval", f"ckpt_path={path}", "name=imported",
                                         f"paths.root={tmp_path}"))
    assert evaluated["metrics"] == record["metrics"]
    assert read_results(tmp_path / "imported" / "eval-weights")["metrics"] == record["metrics"]


def test_eval_refuses_missing_or_mismatched_checkpoints(trained, tmp_path):
    overrides, _, run_dir = trained
    with pytest.raises(ConfigError, match="ckpt_path.*no such file"):
        run(compose_config(*overrides, "mode=eval", f"ckpt_path={tmp_path / 'none.ckpt'}"))
    with pytest.raises(ConfigError, match="mode=eval needs ckpt_path"):
        run(compose_config(*overrides, "mode=eval"))
    path = tmp_path / "vit.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(ConfigError, match="does not fit model resnet18"):
        run(compose_config(*overrides, "mode=eval", f"ckpt_path={path}", "name=other"))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        run(compose_config(*overrides, "mode=eval", f"ckpt_path={tmp_path / 'junk.ckpt'}"))
