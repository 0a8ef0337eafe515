"""The NBIA REST API client (the only package that imports `requests`)."""
