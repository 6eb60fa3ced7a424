export PYTHONPATH=$PWD KVPACK_CACHE=/tmp/kvc PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
timeout 170 python -m pytest -q -x -m "not model and not slow" tests/kernels/test_encode.py tests/hf/test_static_cache.py tests/hf/test_graph_generate.py -p no:cacheprovider > $OUT/tests.txt 2>&1
tail -3 $OUT/tests.txt
timeout 120 python benchmarks/encode_sweep.py --decode --json $OUT/encode_decode.json > $OUT/encode_decode.txt 2>&1
grep -v Warn $OUT/encode_decode.txt | tail -40
timeout 170 python -m kvpack bench generate --layers 32 --context 32768 --batch 1 --new-tokens 64 --caches graph:4bit,graph:int:4 --json $OUT/gen_b1.json > $OUT/gen_b1.txt 2>&1
grep "ms/token" $OUT/gen_b1.txt
timeout 100 python benchmarks/step_profile.py --caches graph:4bit --layers 8 --tokens 16 --json $OUT/step_profile.json > $OUT/step_profile.txt 2>&1
grep -A14 "kernels/token" $OUT/step_profile.txt
