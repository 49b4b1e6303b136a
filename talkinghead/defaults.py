"""MuseTalk's published inference values, which framegrid adopts (the config models take their defaults
from here; a model built without a config gets the same). Nothing else declares them."""

from typing import Final, Literal

VERSION: Final[Literal["v15", "v1"]] = "v15"  # the MuseTalk release of the weights
CHEEK_WIDTH = 90  # jaw mode: half-width (px of the 512x512 parse) of the band kept between the cheeks
BATCH_SIZE = 8  # frames per UNet batch
