"""Stage 4, analysis: the test-set scores and the error analysis (calibration, flip TTA, human
ambiguity, Grad-CAM, corruptions).

It computes numbers; reporting draws and writes them.
"""
