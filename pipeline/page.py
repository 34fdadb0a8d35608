"""The page at `GET /` of `ovqvae serve`: choose k or a deadline, sample, and watch the samples
refine as codes arrive. One self-contained HTML file (no build step, nothing from a CDN);
it reads the `:anytime` event stream with fetch and draws every refinement.

For tests, `window.ovqvae` records what the page showed: {ks: [k per event], done, error}.
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
</fieldset>
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
const $ = (id) => document.getElementById(id);
window.ovqvae = {ks: [], done: false, error: null};
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
  const byDeadline = document.querySelector("input[name=mode]:checked").value === "deadline";
  const body = {num_samples: +$("n").value, seed: +$("seed").value,
                temperature: +$("temperature").value, stream: true,
                deadline_ms: byDeadline ? +$("deadline").value : 60000};
  if (!byDeadline) { body.max_codes = +$("k").value; body.min_codes = +$("k").value; }
  window.ovqvae = {ks: [], done: false, error: null};
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
