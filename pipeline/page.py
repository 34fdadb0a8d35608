"""The page at `GET /` of `ovqvae serve`: choose k, a deadline or a quality floor, sample,
and watch the samples refine as codes arrive. One self-contained HTML file (no build step,
nothing from a CDN); it reads the `:anytime` event stream with fetch and draws every
refinement, and draws the model's quality profile with each answer's k marked.

For tests, `window.ovqvae` records what the page showed: {ks: [k per event], done, error,
marked: [the final k of each answer, as marked on the profile]}.
"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>ovqvae: anytime sampling</title>
<style>
 body { font: 15px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 980px; }
 h1 { font-size: 20px; margin: 0 0 4px; } p.sub { margin: 0 0 16px; color: #555; }
 fieldset { border: 1px solid #ccc; border-radius: 6px; margin: 0 0 12px; padding: 8px 12px; }
 label { margin-right: 16px; white-space: nowrap; } input[type=number] { width: 80px; }
 button { font-size: 15px; padding: 6px 18px; }
 #status { font-family: ui-monospace, monospace; margin: 12px 0; min-height: 1.4em; }
 #bar { height: 6px; background: #eee; border-radius: 3px; overflow: hidden; margin: 4px 0 12px; }
 #fill { height: 100%; width: 0; background: #3b7ddd; }
 #grid { display: grid; grid-template-columns: repeat(8, 96px); gap: 6px; }
 #grid img { width: 96px; height: 96px; image-rendering: pixelated; background: #000; }
 #profile { border: 1px solid #ddd; border-radius: 4px; margin: 0 0 12px; }
</style></head>
<body>
<h1>Anytime sampling</h1>
<p class="sub">Model <b>__NAME__</b>: K = __K__ codes per sample. Codes arrive coarse to fine;
every refinement is decoded as it comes.</p>
<fieldset>
 <label><input type="radio" name="mode" value="k" checked> stop at k =
  <input id="k" type="range" min="1" max="__K__" value="__K__">
  <span id="kval">__K__</span></label>
 <label><input type="radio" name="mode" value="deadline"> or a deadline of
  <input id="deadline" type="number" min="1" value="200"> ms</label>
 <label><input type="radio" name="mode" value="quality"> with a PSNR of at least
  <input id="psnr" type="number" min="1" step="0.5" value="20"> dB</label>
</fieldset>
<canvas id="profile" width="640" height="170"></canvas>
<fieldset>
 <label>samples <input id="n" type="number" min="1" max="64" value="16"></label>
 <label>seed <input id="seed" type="number" min="0" value="0"></label>
 <label>temperature <input id="temperature" type="number" min="0.05" step="0.05" value="1"></label>
 <button id="sample">Sample</button>
</fieldset>
<div id="status">Press Sample.</div>
<div id="bar"><div id="fill"></div></div>
<div id="grid"></div>
<script>
const K = __K__, URL_ANYTIME = "/v1/models/__NAME__:anytime";
const URL_PROFILE = "/v1/models/__NAME__/profile";
const $ = (id) => document.getElementById(id);
window.ovqvae = {ks: [], done: false, error: null, marked: []};
let profile = null;

// The quality profile: mean PSNR (blue) and sample+decode time at the largest profiled batch
// (grey) against k, each answer's final k a red mark.
function drawProfile() {
  const c = $("profile"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  if (!profile || !profile.k) { g.fillText("this model has no quality profile", 10, 20); return; }
  const left = 44, right = c.width - 50, top = 12, bottom = c.height - 24;
  const x = (k) => left + (right - left) * (k - 1) / Math.max(K - 1, 1);
  const curve = (ks, values, color) => {
    const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
    g.strokeStyle = color; g.beginPath();
    ks.forEach((k, i) => { const y = bottom - (bottom - top) * (values[i] - lo) / span;
                           i ? g.lineTo(x(k), y) : g.moveTo(x(k), y); });
    g.stroke(); return [lo, hi];
  };
  const [plo, phi] = curve(profile.k, profile.psnr_mean, "#3b7ddd");
  const batches = Object.keys(profile.seconds).map(Number).sort((a, b) => a - b);
  const t = profile.seconds[String(batches[batches.length - 1])];
  const [tlo, thi] = curve(t.k, t.seconds.map((s) => 1e3 * s), "#999");
  g.fillStyle = "#3b7ddd"; g.fillText(`PSNR ${plo.toFixed(1)}..${phi.toFixed(1)} dB`, left, c.height - 6);
  g.fillStyle = "#777";
  g.fillText(`time ${tlo.toFixed(0)}..${thi.toFixed(0)} ms (batch ${batches[batches.length - 1]})`,
             right - 170, c.height - 6);
  g.fillText("k = 1", left - 10, bottom + 12); g.fillText(`k = ${K}`, right - 20, bottom + 12);
  g.strokeStyle = "#d33";
  window.ovqvae.marked.forEach((k) => { g.beginPath(); g.moveTo(x(k), top); g.lineTo(x(k), bottom); g.stroke(); });
}
fetch(URL_PROFILE).then((r) => r.json()).then((b) => { profile = b.quality_profile; drawProfile(); });
$("k").oninput = () => { $("kval").textContent = $("k").value; };

function show(event) {
  const grid = $("grid");
  while (grid.children.length < event.images.length) grid.appendChild(document.createElement("img"));
  event.images.forEach((png, i) => { grid.children[i].src = "data:image/png;base64," + png; });
  $("fill").style.width = (100 * event.num_codes / K) + "%";
  $("status").textContent = `k = ${event.num_codes} of ${K} codes, ${event.elapsed_ms.toFixed(0)} ms` +
    (event.final ? " (final)" : "");
  window.ovqvae.ks.push(event.num_codes);
}

async function sample() {
  const mode = document.querySelector("input[name=mode]:checked").value;
  const body = {num_samples: +$("n").value, seed: +$("seed").value,
                temperature: +$("temperature").value, stream: true,
                deadline_ms: mode === "k" ? 60000 : +$("deadline").value};
  if (mode === "k") { body.max_codes = +$("k").value; body.min_codes = +$("k").value; }
  if (mode === "quality") body.min_quality = {psnr: +$("psnr").value};
  window.ovqvae = {ks: [], done: false, error: null, marked: window.ovqvae.marked};
  $("grid").innerHTML = ""; $("fill").style.width = "0";
  $("status").textContent = "sampling ...";
  $("sample").disabled = true;
  try {
    const response = await fetch(URL_ANYTIME, {method: "POST", body: JSON.stringify(body),
                                               headers: {"Content-Type": "application/json"}});
    if (!response.ok) throw new Error((await response.json()).error || response.statusText);
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\\n\\n")) >= 0) {
        const line = buffer.slice(0, end); buffer = buffer.slice(end + 2);
        if (!line.startsWith("data: ")) continue;
        const event = JSON.parse(line.slice(6));
        if (event.error) throw new Error(event.error);
        show(event);
      }
    }
    window.ovqvae.done = true;
    window.ovqvae.marked.push(window.ovqvae.ks[window.ovqvae.ks.length - 1]);
    drawProfile();
  } catch (e) {
    window.ovqvae.error = String(e.message || e);
    $("status").textContent = "error: " + window.ovqvae.error;
  } finally {
    $("sample").disabled = false;
  }
}
$("sample").onclick = sample;
</script>
</body></html>
"""


def page(model_name: str, code_length: int) -> str:
    """The page for a model named `model_name` with K = `code_length`."""
    return _PAGE.replace("__NAME__", model_name).replace("__K__", str(int(code_length)))
