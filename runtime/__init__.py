from janusflow_trt import __version__  # noqa: F401  (the one version string)
