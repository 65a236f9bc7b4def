"""Real servers for enrollbench to run against (started on loopback in a temporary folder)."""
