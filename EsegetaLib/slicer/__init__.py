"""The Slicer side of Esegeta: everything the 3D Slicer module needs, Qt-free and testable on
slicer-core's MRML.

Layers (each imports only those above it, no circles):

- `colors`      Slicer's file colour tables rebuilt from matplotlib (leaf).
- `slicer_env`  `import slicer` with a clear error, scenes with Slicer's logics (slicer-core).
- `scene`       the MRML bridge: arrays <-> nodes, map display, folders, tables, .mrb.
- `previews`    off-screen slice and 3D renders of a scene.
- `review`      the review bundle `esegeta explain` writes (scene + previews).
- `slicer_logic` the module panel's decisions (dependencies, method panel, request, messages);
  imports no torch.
- `worker`      the background process (`python -m EsegetaLib.slicer.worker JOB.json`).
- `slicer_run`  one run started from a scene: inputs out, worker, results imported.

Nothing is imported here, so `import EsegetaLib.slicer.slicer_logic` stays light.
"""
