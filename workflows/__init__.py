"""Workflow definitions bundled with edgesaga (YAML beside their step modules)."""
