"""Run the agent CLI as ``python -m mailpush.agent``."""

from mailpush.agent.cli import main

main()
