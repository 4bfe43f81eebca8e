"""The data-source layer: turn a spec string into images, labels and captions.

``open_source(spec, split)`` gives an :class:`ImageSource` (random access) or, for streamed hub data,
a :class:`StreamSource`; ``open_data`` does the same with a recipe's ``data`` section, ``limit_source``
keeps the first records, and ``list_splits(spec)`` names the splits for messages.  Importing this package
pulls in only torch and numpy; :mod:`datasets`, :mod:`torchvision.io` and scikit-learn are imported
when a source that needs them is opened or decoded.
"""

from clcli.data.base import ImageSource, StreamSource
from clcli.data.sources import limit_source, list_splits, open_data, open_source

__all__ = ["ImageSource", "StreamSource", "limit_source", "list_splits", "open_data", "open_source"]
