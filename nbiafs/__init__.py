"""nbiafs: The Cancer Imaging Archive's NBIA REST API as a read-only filesystem."""

__version__ = "0.1.0"
