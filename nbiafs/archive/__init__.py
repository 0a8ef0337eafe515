"""The local NBIA-compatible archive: the backend of the tests, the demo and the benchmarks.

`LocalArchive` (server.py) serves an `ArchiveIndex` (records.py) built from a
synthetic spec (spec.py, synth.py, phantom.py) or a folder of DICOM files
(content.py), with the endpoints of endpoints.py, tokens of tokens.py and the
network shaping of faults.py.
"""
