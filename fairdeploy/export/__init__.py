"""Export stage: ONNX FP32/FP16/INT8 (Q/DQ), calibration sets, profiles, TensorRT engines and sidecars.

The file contract it writes (I/O names, ONNX metadata, engine sidecars) is fairdeploy.artifact."""
