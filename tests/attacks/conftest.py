from tests._sample_collector import _keep_samples

__all__ = ["_keep_samples"]
