# A GGUF F16 of the same model shape as a quantized GGUF, every weight a constant (compresses to
# nothing): llama.cpp's speed does not depend on the values. For scripts/device/cpu_bench.sh.
import sys
import numpy as np
import gguf

src, dst = sys.argv[1], sys.argv[2]
r = gguf.GGUFReader(src)
arch = r.fields["general.architecture"].contents()
w = gguf.GGUFWriter(dst, arch)
for name, f in r.fields.items():
    if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type", "general.quantization_version"):
        continue
    vt = f.types[0]
    if vt == gguf.GGUFValueType.ARRAY:
        w.add_key_value(name, f.contents(), vt, sub_type=f.types[-1])
    else:
        w.add_key_value(name, f.contents(), vt)
w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
for t in r.tensors:
    shape = [int(x) for x in reversed(list(t.shape))]  # numpy order
    if len(shape) == 1:
        w.add_tensor(t.name, np.ones(shape, dtype=np.float32))
    else:
        w.add_tensor(t.name, np.full(shape, 0.01, dtype=np.float16))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
