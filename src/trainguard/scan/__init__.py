"""Static analysis of model artifacts. Nothing in an artifact is ever imported, called or loaded."""

from trainguard.scan.api import ScanOptions, scan_bytes, scan_file, scan_path
from trainguard.scan.limits import ScanLimits
from trainguard.scan.policy import Policy
from trainguard.scan.result import SCHEMA_VERSION, FileResult, ScanReport

__all__ = [
    "SCHEMA_VERSION",
    "FileResult",
    "Policy",
    "ScanLimits",
    "ScanOptions",
    "ScanReport",
    "scan_bytes",
    "scan_file",
    "scan_path",
]
