"""Run inside ModelOpt's own environment (it pins onnx / onnxruntime-gpu): the TensorRT INT8 flavour of
one FP32 graph, calibrated on the recorded set. Started by export/int8.py as
`PY -m export.modelopt_worker FP32 CALIB_DIR GRAPH OUT METHOD [EXCLUDE,...]` with the repo on PYTHONPATH.

ModelOpt's int8 mode: symmetric INT8 Q/DQ (zero points 0), weights per output channel, activations per
tensor, placement by TensorRT's fusion rules, float parts converted to FP16 (its AutoCast) with FP32 I/O.
"""

from __future__ import annotations

import sys

from onnxruntime.quantization import CalibrationDataReader

from janusflow_trt.calibration.record import CalibrationData


class Reader(CalibrationDataReader):
    def __init__(self, calib: CalibrationData, graph: str):
        self.calib, self.graph = calib, graph
        self.rewind()

    def rewind(self) -> None:
        self._it = iter(self.calib.samples(self.graph))

    def get_next(self):
        return next(self._it, None)

    def get_first(self):  # ModelOpt probes the graph with one sample
        return next(iter(self.calib.samples(self.graph)))


def main(argv: list[str]) -> int:
    from modelopt.onnx.quantization import quantize  # only in ModelOpt's own environment (this process's)

    fp32, calib_dir, graph, out, method, *rest = argv
    exclude = [n for n in (rest[0].split(",") if rest else []) if n]
    quantize(fp32, quantize_mode="int8", calibration_data_reader=Reader(CalibrationData(calib_dir), graph),
             calibration_eps=["cpu"], calibration_method=method, nodes_to_exclude=exclude or None,
             high_precision_dtype="fp16", output_path=out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
