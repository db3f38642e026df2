"""HTTP routers, one module per area: health, search, images, audit (+ classify, describe)."""
