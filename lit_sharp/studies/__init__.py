"""Self-contained studies that reproduce a figure of the paper with the library's measures."""
