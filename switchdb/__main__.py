"""`python -m switchdb`: the same as the `switchdb` console script."""
import sys

from switchdb.cli import main

sys.exit(main())
