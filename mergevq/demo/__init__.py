"""``mergevq demo``: MergeVQ end to end on real photographs in minutes on a CPU, with an HTML report.

- :mod:`~mergevq.demo.photos`: the built-in photographs (scikit-image wheel) or a folder, crops, held-out photos;
- :mod:`~mergevq.demo.settings`: how much the demo trains (full run, ``--quick`` smoke run);
- :mod:`~mergevq.demo.tiles`: whole photos through a small tokenizer, tile by tile;
- :mod:`~mergevq.demo.reconstruction`: held-out scores, merge maps and panels at K = L, L/2, L/4;
- :mod:`~mergevq.demo.generation`: tokens → generator → samples per photo;
- :mod:`~mergevq.demo.steps`: the project commands the demo runs;
- :mod:`~mergevq.demo.curves`, :mod:`~mergevq.demo.page`: training curves and ``report.html``;
- :mod:`~mergevq.demo.run`: the pipeline.
"""

from mergevq.demo.run import DemoResult, run_demo
from mergevq.demo.settings import DemoSettings

__all__ = ["DemoResult", "DemoSettings", "run_demo"]
