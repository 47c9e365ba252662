"""The module's logic on the bundled sample and the bundled model, inside Slicer: two cheap
methods, the nodes checked; then a cancelled run must leave the scene as it was. Skipped in
testing mode (extension build machines) when PyTorch and Captum are absent: nothing is installed."""
import logging
import unittest

import qt
import slicer


class EsegetaLogicTest(unittest.TestCase):
    def setUp(self):
        import Esegeta

        slicer.mrmlScene.Clear()
        self.module = Esegeta
        self.logic = Esegeta.EsegetaLogic()
        if not self.logic.dependenciesPresent():
            if slicer.app.testingEnabled():
                logging.warning("Esegeta logic test skipped: PyTorch/Captum are not installed (nothing is "
                                "installed on build machines). Install them and run the test again.")
                self.skipTest("PyTorch/Captum are not installed")
            if not self.logic.ensureDependencies(askConfirmation=True):
                self.skipTest("the packages Esegeta needs were not installed")

    def parameterNode(self):
        import SampleData

        self.module.registerSampleData()
        pn = self.logic.getParameterNode()
        pn.inputVolume = SampleData.SampleDataLogic().downloadSample(self.module.SAMPLE_NAME)
        self.assertIsNotNone(pn.inputVolume, "the bundled sample did not load")
        pn.modelPath, pn.region, pn.device, pn.metrics, pn.methodParams = "", "predicted", "auto", "", "{}"
        pn.methods = ",".join(self.module.SELF_TEST_METHODS)
        return pn

    def test_explain_sample(self):
        import numpy as np

        pn = self.parameterNode()
        run = self.logic.startRun(pn)
        self.assertEqual(run.wait(timeout=1800), "done", (run.failure or {}).get("details", ""))
        nodes = self.logic.importRun(run, pn)
        self.assertTrue(run.settled, "the worker or its folder outlived the run")
        self.assertEqual(sorted(nodes["maps"]), sorted(self.module.SELF_TEST_METHODS))
        shape = slicer.util.arrayFromVolume(pn.inputVolume).shape
        for method, node in nodes["maps"].items():
            values = slicer.util.arrayFromVolume(node)
            self.assertEqual((values.shape, values.dtype), (shape, np.float32))
            self.assertTrue(np.isfinite(values).all() and np.abs(values).max() > 0, method)
        self.assertGreater(nodes["segmentation"].GetSegmentation().GetNumberOfSegments(), 0)
        self.assertEqual(nodes["table"].GetNumberOfRows(), len(self.module.SELF_TEST_METHODS))
        composite = slicer.app.layoutManager().sliceWidget("Red").sliceLogic().GetSliceCompositeNode()
        self.assertEqual(composite.GetForegroundVolumeID(), pn.shownMap.GetID())

    def test_cancel_leaves_the_scene_unchanged(self):
        pn = self.parameterNode()
        before = [slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes())]
        run = self.logic.startRun(pn)
        for _ in range(20):  # let it start working, then cancel
            run.poll()
            slicer.app.processEvents()
            qt.QThread.msleep(100)
        run.cancel(wait=True)
        self.assertEqual(run.state, "cancelled")
        self.assertTrue(run.settled and run.workdir is None)
        after = [slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes())]
        self.assertEqual(before, after)
