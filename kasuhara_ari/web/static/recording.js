// The recording page: waveform (peaks computed by the server) and event markers drawn on a canvas; the
// play button and the markers drive the <audio> element, whose seeks become HTTP Range requests.
// No inline script (CSP script-src 'self'); every value comes from data-* attributes of the page.
"use strict";
(() => {
  const box = document.getElementById("player");
  const canvas = document.getElementById("waveform");
  if (!box || !canvas) return;
  const audio = document.getElementById("audio");
  const play = document.getElementById("play");
  const clock = document.getElementById("clock");
  const check = document.getElementById("content-check");
  const markers = Array.from(document.querySelectorAll("button.marker")).map((b) => ({
    button: b, kind: b.dataset.kind, t: Number(b.dataset.t) || 0,
  }));
  const COLOURS = {
    notice: "#2c7be5", answered: "#2e8b57", flag: "#c0392b", warning: "#e67e22",
    supervisor: "#8e44ad", monologue: "#b3541e", talk_over: "#b3541e", shouting: "#c0392b", ended: "#5d6b7a",
  };
  let peaks = [];
  let duration = Number(box.dataset.duration) || 0;
  let problem = "";

  const total = () => (audio && isFinite(audio.duration) && audio.duration > 0 ? audio.duration : duration);

  function fmt(s) {
    const m = Math.floor(s / 60);
    const r = Math.floor(s % 60);
    return `${m}:${String(r).padStart(2, "0")}`;
  }

  function draw() {
    const ctx = canvas.getContext("2d");
    const w = canvas.width;
    const h = canvas.height;
    const mid = h / 2;
    ctx.clearRect(0, 0, w, h);
    ctx.fillStyle = "#eef1f5";
    ctx.fillRect(0, 0, w, h);
    if (peaks.length) {
      ctx.fillStyle = "#23364d";
      const step = w / peaks.length;
      peaks.forEach(([lo, hi], i) => {
        const top = mid - (hi / 127) * mid;
        const bottom = mid - (lo / 127) * mid;
        ctx.fillRect(i * step, top, Math.max(1, step - 0.2), Math.max(1, bottom - top));
      });
    } else {
      ctx.strokeStyle = "#9aa7b4";
      ctx.beginPath();
      ctx.moveTo(0, mid);
      ctx.lineTo(w, mid);
      ctx.stroke();
      if (problem) {
        ctx.fillStyle = "#5d6b7a";
        ctx.font = "14px sans-serif";
        ctx.fillText(problem, 8, 20);
      }
    }
    const len = total();
    if (len > 0) {
      if (audio) {
        ctx.fillStyle = "#f1c40f";
        ctx.fillRect(Math.min(w - 2, (audio.currentTime / len) * w), 0, 2, h);
      }
      // Markers over the playhead: a line and a flag at the top, in the colour of their button.
      for (const m of markers) {
        const x = Math.min(w - 3, (m.t / len) * w);
        ctx.fillStyle = COLOURS[m.kind] || "#000";
        ctx.fillRect(x, 0, 3, h);
        ctx.fillRect(x, 0, 12, 8);
      }
    }
  }

  function seek(t) {
    if (!audio) return;
    audio.currentTime = Math.max(0, t);
    if (audio.paused) audio.play().catch(() => {});
  }

  for (const m of markers) {
    m.button.addEventListener("click", () => seek(m.t));
  }

  canvas.addEventListener("click", (e) => {
    const len = total();
    if (!audio || !(len > 0)) return;
    const rect = canvas.getBoundingClientRect();
    seek(((e.clientX - rect.left) / rect.width) * len);
  });

  if (audio && play) {
    play.addEventListener("click", () => {
      if (audio.paused) audio.play().catch(() => {});
      else audio.pause();
    });
    const label = () => { play.textContent = audio.paused ? play.dataset.play : play.dataset.pause; };
    audio.addEventListener("play", label);
    audio.addEventListener("pause", label);
    audio.addEventListener("ended", label);
    audio.addEventListener("timeupdate", () => {
      if (clock) clock.textContent = `${fmt(audio.currentTime)} / ${fmt(total())}`;
      draw();
    });
    audio.addEventListener("loadedmetadata", draw);
  }

  if (box.dataset.waveform) {
    if (check && !check.textContent.trim()) check.textContent = check.dataset.checking;
    fetch(box.dataset.waveform, { credentials: "same-origin" })
      .then((r) => r.json().then((body) => ({ ok: r.ok, body })))
      .then(({ ok, body }) => {
        if (!ok) {
          problem = box.dataset.unavailable;
          if (check) check.textContent = "";
        } else {
          peaks = Array.isArray(body.peaks) ? body.peaks : [];
          if (body.duration_s > 0) duration = body.duration_s;
          if (body.problem) problem = box.dataset.unavailable;
          if (check) {
            check.classList.remove("ok", "bad");
            if (body.verification === "verified") {
              check.textContent = check.dataset.verified;
              check.classList.add("ok");
            } else if (body.verification === "mismatch") {
              check.textContent = check.dataset.mismatch;
              check.classList.add("bad");
            } else {
              check.textContent = "";
            }
          }
        }
        canvas.dataset.ready = "true";
        draw();
      })
      .catch(() => {
        problem = box.dataset.unavailable;
        canvas.dataset.ready = "true";
        draw();
      });
  } else {
    canvas.dataset.ready = "true";
  }
  window.addEventListener("resize", draw);
  draw();
})();
