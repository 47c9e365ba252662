"""The Esegeta panel inside Slicer: the parameter node connected to the .ui (`connectGui`), the
generated method panel and presets, the region and class menus, the segment and point pickers,
and, when PyTorch and Captum are present, Apply and the poll loop on the bundled sample."""
import unittest

import qt
import slicer


class EsegetaWidgetTest(unittest.TestCase):
    def setUp(self):
        slicer.app.processEvents()
        slicer.mrmlScene.Clear()
        import Esegeta

        self.module = Esegeta
        self.widget = Esegeta.EsegetaWidget(slicer.qMRMLWidget())
        self.widget.setup()
        self.ui = self.widget.ui

    def tearDown(self):
        self.widget.cleanup()
        slicer.app.processEvents()

    def loadSample(self):
        import SampleData

        self.module.registerSampleData()
        return SampleData.SampleDataLogic().downloadSample(self.module.SAMPLE_NAME)

    def test_generated_panel_lists_the_catalogue_in_families(self):
        catalog = self.module.slicer_logic.method_catalog()
        self.assertEqual(sorted(self.widget.methodCheckBoxes), sorted(m["name"] for m in catalog))
        self.assertEqual(sorted(self.widget.metricCheckBoxes), sorted(self.module.slicer_logic.metric_names()))
        self.assertTrue(all(box.toolTip for box in self.widget.methodCheckBoxes.values()))

    def test_presets_tick_their_methods_and_custom_shows_the_list(self):
        pn = self.widget._parameterNode
        self.ui.presetComboBox.currentText = "Thorough"
        self.assertEqual(pn.preset, "Thorough")  # connectGui: combo -> parameter node
        expected = list(self.module.slicer_logic.PRESETS["Thorough"])
        self.assertEqual(self.module.slicer_logic.split_names(pn.methods), expected)
        ticked = [name for name, box in self.widget.methodCheckBoxes.items() if box.checked]
        self.assertEqual(sorted(ticked), sorted(expected))
        self.assertFalse(self.ui.methodsFrame.visible)
        self.ui.presetComboBox.currentText = "Custom"
        self.assertTrue(self.ui.methodsFrame.isVisibleTo(self.ui.methodsCollapsibleButton))
        self.widget.methodCheckBoxes["Occlusion"].checked = False
        self.assertNotIn("Occlusion", pn.methods)

    def test_region_menu_in_words_shows_the_matching_picker(self):
        pn = self.widget._parameterNode
        labels = [self.ui.regionComboBox.itemText(i) for i in range(self.ui.regionComboBox.count)]
        self.assertEqual(labels[:4], ["the model's segmentation", "a segment", "a point", "the whole volume"])
        self.ui.regionComboBox.currentIndex = labels.index("a segment")
        self.assertEqual(pn.region, "roi")
        self.assertTrue(self.ui.roiSegmentSelector.isVisibleTo(self.ui.inputsCollapsibleButton))
        self.assertFalse(self.ui.pointRow.isVisibleTo(self.ui.inputsCollapsibleButton))

    def test_segment_painted_after_choosing_the_segmentation_can_be_chosen(self):
        pn = self.widget._parameterNode
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        self.ui.roiSegmentSelector.setCurrentNode(segmentation)
        self.assertIs(pn.roiSegmentation, segmentation)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("painted later")
        self.ui.roiSegmentSelector.setCurrentSegmentID(segmentId)
        self.assertEqual(pn.roiSegmentId, segmentId)

    def test_class_menu_names_the_bundled_models_classes(self):
        items = [self.ui.targetClassComboBox.itemText(i) for i in range(self.ui.targetClassComboBox.count)]
        self.assertTrue(items, "no classes listed")
        self.ui.targetClassComboBox.currentIndex = 0
        self.assertEqual(self.widget._parameterNode.targetClass, self.ui.targetClassComboBox.itemData(0))

    def test_patch_size_offers_only_valid_sizes(self):
        sizes = [self.ui.patchSizeComboBox.itemData(i) for i in range(self.ui.patchSizeComboBox.count)]
        self.assertEqual(tuple(sizes), self.module.slicer_logic.PATCH_SIZE_CHOICES)

    def test_apply_runs_in_the_background_and_the_poll_loop_imports_the_maps(self):
        logic = self.widget.logic
        if not logic.dependenciesPresent():
            self.skipTest("PyTorch/Captum are not installed (never installed by the test)")
        volume = self.loadSample()
        pn = self.widget._parameterNode
        pn.inputVolume = volume
        pn.preset = "Custom"
        pn.methods = "Saliency"
        self.widget.onApplyButton()
        self.assertEqual(self.ui.applyButton.text, "Cancel")
        timer = qt.QElapsedTimer()
        timer.start()
        while self.widget.run is not None and timer.elapsed() < 1800 * 1000:
            slicer.app.processEvents()
            qt.QThread.msleep(50)
        self.assertIsNone(self.widget.run)
        self.assertEqual(self.ui.applyButton.text, "Apply")
        self.assertIsNotNone(pn.shownMap, self.ui.statusLabel.text)
        self.assertIn("Saliency", pn.shownMap.GetName())
        self.assertIn("Saliency", self.ui.logTextEdit.toPlainText())
