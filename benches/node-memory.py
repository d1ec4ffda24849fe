#!/usr/bin/env python3
"""Where a cluster node's memory per chat goes, on one node: RSS per chat after N attaches
(in one burst, or BATCH at a time), then again after glibc's malloc_trim(0) (called with gdb),
which returns freed pages: what it gives back was the burst's, not the chats'. With HEAP=1
the node runs under heaptrack (heaptrack_print --print-peaks 1 shows the peak's allocation
sites; the RSS figures are then heaptrack's, not the node's; the node is SIGKILLed at the end so that what the idle
chats hold shows as heaptrack's leaks: heaptrack_print --print-leaks 1, or --print-flamegraph F --flamegraph-cost-type leaked). docs/benchmarks.md, "Where a cluster node's memory goes".

  benches/node-memory.py GUESTD N cluster|single [MALLOC_ARENA_MAX]
  (needs nats-server on /usr/sbin or PATH for cluster, gdb for the trim)
"""
import subprocess, json, os, sys, time, urllib.request, socket, threading, shutil, tempfile
EXE=sys.argv[1]
sys.argv=sys.argv[:1]+sys.argv[2:]
WORK=tempfile.mkdtemp(prefix="guestd-node-memory-")
NATS=shutil.which("nats-server") or "/usr/sbin/nats-server"
N=int(sys.argv[1]); mode=sys.argv[2]  # cluster|single
def free_port():
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]; s.close(); return p
def rss(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith(os.environ.get("NODE_MEMORY_FIELD","VmRSS")): return int(l.split()[1])
emu_port=free_port()
cfg=os.path.join(WORK,"emu.toml"); open(cfg,"w").write('heartbeat_interval = "5000ms"\nreconnect_grace = "5m"\ninactivity_timeout = "2h"\nlog_limit = 1000\n')
emu=subprocess.Popen([EXE,"emulator","--config",cfg,"--listen",f"127.0.0.1:{emu_port}"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL,env=dict(os.environ,RUST_LOG="warn"))
base=f"http://127.0.0.1:{emu_port}"
for _ in range(100):
    try: urllib.request.urlopen(base+"/", timeout=1); break
    except Exception as e:
        if hasattr(e,'code'): break
        time.sleep(0.1)
req=urllib.request.Request(base+"/emulator/bulk/create",data=json.dumps({"count":N}).encode(),headers={"content-type":"application/json"})
chats=json.load(urllib.request.urlopen(req))
env=dict(os.environ, GUESTD_GENESYS__API_BASE=base, GUESTD_GENESYS__STREAM_HOSTS="[\"127.0.0.1\"]", GUESTD_SESSION__HEARTBEAT_INTERVAL="5000ms",
  GUESTD_SESSION__RECONNECT_GRACE="2m", GUESTD_SESSION__INACTIVITY_TIMEOUT="1h", GUESTD_STREAM__MAX_CONCURRENT_CONNECTS="256",
  GUESTD_JOURNAL__ENABLED="false", GUESTD_CONTROL__HTTP_LISTEN="", GUESTD_SUPERVISOR__MAX_SESSIONS="200000", RUST_LOG=os.environ.pop("NODE_MEMORY_LOG","error"))
env.pop("GUESTD_CONFIG",None)
nats=None
if mode=="cluster":
    np=free_port(); d=os.path.join(WORK,"js"); shutil.rmtree(d,ignore_errors=True)
    nats=subprocess.Popen([NATS,"-js","-a","127.0.0.1","-p",str(np),"-sd",d],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL)
    time.sleep(1)
    env.update(GUESTD_CLUSTER__SERVERS=f'["nats://127.0.0.1:{np}"]', GUESTD_CLUSTER__NODE_ID="n1", GUESTD_CLUSTER__REPLICAS="1",
      GUESTD_CLUSTER__LEASE="6s", GUESTD_CLUSTER__RENEW="2s", GUESTD_CLUSTER__FENCE_MARGIN="2s", GUESTD_CLUSTER_SEAL_KEY="0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
    if len(sys.argv)>3: env["MALLOC_ARENA_MAX"]=sys.argv[3]
pre=["heaptrack","-o",os.path.join(WORK,"heap")] if os.environ.get("HEAP") else []
g=subprocess.Popen(pre+[EXE,"run"],stdin=subprocess.PIPE,stdout=subprocess.PIPE,stderr=open(os.path.join(WORK,"guestd.err"),"w"),env=env)
# ready: wait for first stdout line? just wait a bit for startup
time.sleep(3)
pid=g.pid
if pre:  # heaptrack's script runs guestd as its child: measure and stop guestd itself
    for c in subprocess.run(["pgrep","-P",str(g.pid)],capture_output=True,text=True).stdout.split():
        if open(f"/proc/{c}/cmdline","rb").read().split(b"\0")[0].decode()==EXE: pid=int(c)
r0=rss(pid)
batch=int(os.environ.get("BATCH","0")) or N
up=0
def reader():
    global up
    for l in g.stdout:
        try: v=json.loads(l)
        except: continue
        if v.get("type")=="connected": up+=1
threading.Thread(target=reader,daemon=True).start()
for i in range(0,N,batch):
    for c in chats[i:i+batch]:
        c=dict(c); c["cmd"]="attach"; g.stdin.write((json.dumps(c)+"\n").encode())
    g.stdin.flush()
    while up < min(N,i+batch): time.sleep(0.2)
time.sleep(8)
r1=rss(pid)
out=subprocess.run(["gdb","-p",str(pid),"-batch","-ex","call (int)malloc_trim(0)"],capture_output=True,text=True)
time.sleep(1)
r2=rss(pid)
print(f"{mode} N={N} batch={batch} arena={sys.argv[3] if len(sys.argv)>3 else '-'}: base {r0} KiB, after {r1} KiB -> {(r1-r0)*1024/N:.0f} B/chat; after malloc_trim {r2} KiB -> {(r2-r0)*1024/N:.0f} B/chat")
# Under heaptrack, SIGKILL: what the idle chats hold is then heaptrack's "leaked" (--print-leaks 1).
os.kill(pid,9 if pre else 15); g.wait(); emu.kill()
if nats: nats.kill()
shutil.rmtree(os.path.join(WORK,"js"),ignore_errors=True)
print("work files:",WORK)
