"""kvfx lowering: exporting rewritten graphs for production runtimes (ONNX, TensorRT).

Nothing here is imported by the compile path; onnx/onnxscript/torch_tensorrt are imported lazily
inside this package only.
"""
