"""`python -m proxy` is `mlproxy`."""

from proxy.cli import main

main()
