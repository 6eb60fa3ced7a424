export PYTHONPATH=$PWD KVPACK_CACHE=/tmp/kvc PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
timeout 120 python -m pytest -q -m "not model and not slow" tests/kernels/test_cuda_decode.py -k "(every_codec and 128) or window_splits or int4 or int2" -p no:cacheprovider > $OUT/tests3.txt 2>&1
tail -2 $OUT/tests3.txt; grep -E "^(FAILED|ERROR)" $OUT/tests3.txt | head
timeout 130 python -m kvpack bench generate --layers 32 --context 32768 --batch 16 --new-tokens 32 --caches graph:4bit --json $OUT/gen_b16.json > $OUT/gen_b16.txt 2>&1
grep "ms/token" $OUT/gen_b16.txt
