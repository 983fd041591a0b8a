"""The interactive browser viewer of a baked avatar (`pointavatar-viewer`; optional extra ``viewer``).

- `camera`: the browser's orbit camera (viser, OpenCV convention) <-> the avatar's cameras (spec §3.5).
- `controls`: the sliders and the expression / FLAME pose vectors they set.
- `renderer`: one image for a browser camera, cropped to the canvas.
- `app`: the viser server, its GUI and its render threads (imports viser when it starts).

Only `app` needs viser; the other modules are plain PyTorch / NumPy.
"""
