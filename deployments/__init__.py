"""grace-serve: LLM serving on Ray Serve for NVIDIA Grace superchips.

The Serve application lives at ``deployments.app:build_app``; see README.md and DESIGN notes.
"""

__version__ = "0.1.0"
