"""The coding agent: a sandbox for its commands, its tools, the tool loop and the task harness."""
