"""The configuration: the TOML file read into frozen values, units, the node secret."""
