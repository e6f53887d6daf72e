"""`python -m fhir_server ...` is the `cxr` command (for environments without the console script)."""

from fhir_server.cli import main

raise SystemExit(main())
