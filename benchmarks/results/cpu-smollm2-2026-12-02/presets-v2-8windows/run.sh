. /work/main/.venv/bin/activate
export OMP_NUM_THREADS=1
cd /work/main
for p in 4bit 3bit 2.5bit; do
  s=$(date +%s)
  PYTHONPATH=/work/main KVPACK_CACHE_DIR=/tmp/kvc-ev8 kvpack eval --preset $p --windows 8 --text /work/shared/data/wikitext2-test.txt --no-progress --json /tmp/ev8/wt8-$p.json > /tmp/ev8/wt8-$p.log 2>&1
  echo "$p rc=$? $(( $(date +%s)-s ))s" >> /tmp/ev8/done.txt
done
echo ALLDONE >> /tmp/ev8/done.txt
