import sys

from glm_image_onnx.cli import main

sys.exit(main())
