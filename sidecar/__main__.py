"""`python -m sidecar --policy FILE --service NAME --certs DIR --upstream HOST:PORT [--peer NAME=ADDR]...`"""

import sys

from services.common.grpc_engine import default_to_iomgr

default_to_iomgr()  # before grpc loads (see services/common/grpc_engine.py); an operator's own value wins

from sidecar.main import main

sys.exit(main())
