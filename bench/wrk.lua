-- wrk script of the Shop bench (bench/wrk.py runs it).
--
-- Without BENCH_ORDERS: wrk's own request (a GET), answers counted by status.
-- With BENCH_ORDERS naming a file of "token <jwt>" and "sku <code>" lines: every request is
-- a POST /api/order for one unit of a SKU, with a customer's token and an Idempotency-Key
-- of its own (BENCH_RUN, the thread, a counter), tokens and SKUs taken in turn.
-- done() prints one line "BENCH_JSON {...}" with the totals and latency percentiles.

threads = {}
statuses = {}
counter = 0
tid = 0

local tokens, skus = {}, {}
local orders = false
local run = os.getenv("BENCH_RUN") or "run"
local next_tid = 0

function setup(thread)
  next_tid = next_tid + 1
  thread:set("tid", next_tid)
  table.insert(threads, thread)
end

function init(args)
  local path = os.getenv("BENCH_ORDERS")
  if path and path ~= "" then
    orders = true
    for line in io.lines(path) do
      local kind, value = line:match("^(%a+) (.+)$")
      if kind == "token" then
        tokens[#tokens + 1] = value
      elseif kind == "sku" then
        skus[#skus + 1] = value
      end
    end
  end
end

function request()
  if not orders then
    return wrk.request()
  end
  counter = counter + 1
  local headers = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. tokens[(counter + tid) % #tokens + 1],
    ["Idempotency-Key"] = run .. "-" .. tid .. "-" .. counter,
  }
  local sku = skus[(counter * 7 + tid) % #skus + 1]
  local body = '{"orderLineItemDtoList":[{"skuCode":"' .. sku .. '","quantity":1}]}'
  return wrk.format("POST", "/api/order", headers, body)
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
end

function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    local seen = thread:get("statuses")
    if seen then
      for status, n in pairs(seen) do
        counts[status] = (counts[status] or 0) + n
      end
    end
  end
  local parts = {}
  for status, n in pairs(counts) do
    parts[#parts + 1] = string.format('"%s":%d', status, n)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f},"statuses":{%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, table.concat(parts, ",")))
end
