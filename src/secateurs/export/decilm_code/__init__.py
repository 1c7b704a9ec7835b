"""Configuration and modeling code copied into every DeciLM export (loaded there with
``trust_remote_code``); kept as a package so it is installed with secateurs."""
