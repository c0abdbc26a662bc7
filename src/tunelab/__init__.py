"""tunelab: fine-tune open language models on your own data."""

__version__ = "0.1.0"

__all__ = ["Lab", "__version__"]


def __getattr__(name: str):
    # `from tunelab import Lab` without importing the job store for every other use
    if name == "Lab":
        from tunelab.jobs.api import Lab

        return Lab
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
