"""Entry point of `python -m deployments.plan` (see deployments/plan/cli.py)."""

from deployments.plan.cli import main

raise SystemExit(main())
