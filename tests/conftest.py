pytest_plugins = ["nbiafs.archive.pytest_plugin"]
