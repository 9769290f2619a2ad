import sys

from zllm.cli import main

sys.exit(main())
