// Zoom and pan of a Graphviz SVG by its viewBox: wheel zooms at the pointer, drag pans,
// "Fit" shows it whole. Nodes are <g id="step-N" class="node step"> elements.
"use strict";

const Dag = (() => {
  function attach(container, onNodeClick) {
    const svg = container.querySelector("svg");
    if (!svg) return null;
    const box = svg.viewBox.baseVal;
    const whole = { x: box.x, y: box.y, w: box.width, h: box.height };
    let view = { ...whole };
    let dragged = false;

    function apply() {
      svg.setAttribute("viewBox", `${view.x} ${view.y} ${view.w} ${view.h}`);
    }
    function fit() {
      view = { ...whole };
      apply();
    }
    function toSvg(clientX, clientY) {
      const point = svg.createSVGPoint();
      point.x = clientX;
      point.y = clientY;
      return point.matrixTransform(svg.getScreenCTM().inverse());
    }
    function zoom(factor, at) {
      const centre = at || { x: view.x + view.w / 2, y: view.y + view.h / 2 };
      const width = Math.min(Math.max(view.w * factor, 20), whole.w * 4 + 200);
      const scale = width / view.w;
      view = {
        x: centre.x - (centre.x - view.x) * scale,
        y: centre.y - (centre.y - view.y) * scale,
        w: view.w * scale,
        h: view.h * scale,
      };
      apply();
    }

    svg.addEventListener("wheel", (event) => {
      event.preventDefault();
      zoom(event.deltaY > 0 ? 1.2 : 1 / 1.2, toSvg(event.clientX, event.clientY));
    }, { passive: false });

    let start = null;
    svg.addEventListener("pointerdown", (event) => {
      if (event.button !== 0) return;
      start = { x: event.clientX, y: event.clientY, view: { ...view }, scale: 1 / svg.getScreenCTM().a };
      dragged = false;
    });
    svg.addEventListener("pointermove", (event) => {
      if (!start) return;
      const dx = event.clientX - start.x;
      const dy = event.clientY - start.y;
      if (!dragged && Math.hypot(dx, dy) < 4) return;
      if (!dragged) svg.setPointerCapture(event.pointerId);
      dragged = true;
      svg.classList.add("panning");
      view = { ...start.view, x: start.view.x - dx * start.scale, y: start.view.y - dy * start.scale };
      apply();
    });
    const end = () => {
      start = null;
      svg.classList.remove("panning");
    };
    svg.addEventListener("pointerup", end);
    svg.addEventListener("pointercancel", end);
    svg.addEventListener("click", (event) => {
      if (dragged) {
        dragged = false;
        return;
      }
      const node = event.target.closest("g.node");
      if (node && onNodeClick) onNodeClick(node.id);
    });

    const tools = container.closest(".dag").querySelector(".dag-tools");
    tools.querySelector('[data-dag="fit"]').addEventListener("click", fit);
    tools.querySelector('[data-dag="in"]').addEventListener("click", () => zoom(1 / 1.5));
    tools.querySelector('[data-dag="out"]').addEventListener("click", () => zoom(1.5));
    // As tall as the drawing needs at the page's width (a fan-out stands tall, a chain
    // lies flat), within a third and three quarters of the window.
    const tall = (whole.h / whole.w) * container.clientWidth;
    const height = Math.min(Math.max(tall, window.innerHeight / 3), window.innerHeight * 0.75);
    container.style.height = Math.round(height) + "px";
    // A drawing too big to read whole opens at full size on its first steps (left,
    // centred vertically); "Fit" shows it all.
    const width = container.clientWidth;
    if (Math.min(width / whole.w, height / whole.h) < 0.6) {
      view = { x: whole.x, y: whole.y + whole.h / 2 - height / 2, w: width, h: height };
      apply();
    } else {
      fit();
    }
    return { svg, fit, zoom };
  }

  return { attach };
})();
