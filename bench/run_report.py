"""Print a distil_core run's metrics.json as the rows bench/RESULTS.md records."""
import json
import sys

m = json.load(open(sys.argv[1]))
key = f"dev/{m['main_metric']}"
teacher, student = m["teacher_metrics"][key], m["metrics"][key]
p = m["prepare_seconds"]
print(f"teacher {key}: {teacher:.4f} ({m['teacher']['layers']} layers, {m['teacher']['total']:,} parameters)")
print(f"student {key}: {student:.4f} ({m['student']['layers']} layers, {m['student']['total']:,} parameters, "
      f"{m['student']['non_embedding']:,} non-embedding)")
print(f"retention: {student / teacher:.2%}")
print(f"best student {key} over evaluations: {max(h['metrics'][key] for h in m['history']):.4f}")
print(f"wall: data {p['data_s']:.0f}s, teacher fine-tune {p['teacher_s']:.0f}s, teacher outputs "
      f"{p['teacher_outputs_s']:.0f}s, student training {m['train_seconds']:.0f}s, whole run {m['wall_seconds']:.0f}s")
