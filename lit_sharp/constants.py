"""Constants of the CIFAR-10 study (docs/protocol.md sections 1 and 4); torch-free so every module can import them."""

#: Per-channel mean and std of CIFAR-10 used for input normalization, as in the paper's released code.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

NUM_CLASSES = 10

#: The RandAugment policies of ``data.randaugment``: the paper's released code's, or torchvision's.
RANDAUGMENTS = ("paper", "torchvision")

#: The 15 corruptions whose mean is the standard CIFAR-10-C error (Hendrycks and Dietterich 2019).
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression",
)

#: Files the release also ships; they never enter the standard numbers.
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

SEVERITIES = (1, 2, 3, 4, 5)
