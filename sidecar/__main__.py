"""`python -m sidecar --policy FILE --service NAME --certs DIR --upstream HOST:PORT [--peer NAME=ADDR]...`"""

import sys

from sidecar.main import main

sys.exit(main())
