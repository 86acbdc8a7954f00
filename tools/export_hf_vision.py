#!/usr/bin/env python
"""Write a trained stage-2 vision tower as a Hugging Face folder (CLIPVisionModelWithProjection, or
SiglipVisionModel + projection), the folder LLaVA-style models load. Stage 2 writes it on its own
(<run>/export/hf_vision); this tool does it for an existing export.

    python tools/export_hf_vision.py runs/tiny/stage2/export/model [--out DIR]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llm2clip.export_hf import main  # noqa: E402

if __name__ == "__main__":
    main()
