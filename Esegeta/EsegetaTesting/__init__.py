"""Tests that run inside desktop Slicer (Reload and Test, or the extension's ctest): the panel
(`widget_test`, modelled on SlicerNNUnet's Testing/WidgetTestCase.py) and the logic on the
bundled sample (`logic_test`). Outside Slicer, Testing/slicer_module checks statically that every
widget they use exists in the .ui."""
