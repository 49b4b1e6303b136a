"""ultralytics' own prediction defaults, which framegrid adopts so its answers match `YOLO.predict`.

The config models take their defaults from here (`pipeline.config.ModelConfig`); a backend built
without a config gets the same values. Nothing else declares them.
"""

IMGSZ = 640  # inference size
CONFIDENCE = 0.25  # minimum confidence
IOU = 0.7  # NMS IoU threshold
