. /work/main/.venv/bin/activate
export OMP_NUM_THREADS=1
run() { tag=$1; dir=$2; shift 2; s=$(date +%s); (cd $dir && PYTHONPATH=$dir KVPACK_CACHE_DIR=/tmp/kvc-eval-$tag kvpack eval "$@" > /tmp/ev/$NAME.log 2>&1); echo "$NAME rc=$? $(( $(date +%s)-s ))s" >> /tmp/ev/done.txt; }
for p in 4bit 3bit 2.5bit; do NAME=new-wt-$p run new /work/wt-recipe --preset $p --windows 2 --text wikitext2-excerpt --no-progress --json /tmp/ev/new-wt-$p.json; done
NAME=new-emb-4bit run new /work/wt-recipe --preset 4bit --windows 2 --no-progress --json /tmp/ev/new-emb-4bit.json
for p in 4bit 3bit 2.5bit; do NAME=old-wt-$p run old /work/main --preset $p --windows 2 --text wikitext2-excerpt --no-progress --json /tmp/ev/old-wt-$p.json; done
NAME=old-emb-4bit run old /work/main --preset 4bit --windows 2 --no-progress --json /tmp/ev/old-emb-4bit.json
echo ALLDONE >> /tmp/ev/done.txt
