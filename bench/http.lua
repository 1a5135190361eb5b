-- wrk script for bench/http.py: one operation per run, chosen by BENCH_OP.
--   fund      POST /v1/escrows, a unique job id and Idempotency-Key per request
--   release   POST /v1/escrows/{job}/release over the job ids in BENCH_JOBS (one a line)
--   balances  GET /v1/agents/{buyer}/balances, buyers in turn
--   deposits  GET /v1/deposits?limit=50 (one page)
-- BENCH_KEY is the API key, BENCH_RUN makes job ids unique per run, BENCH_BUYERS is the
-- number of buyer and of worker agents (buyer-0 .., worker-0 ..), BENCH_THREADS wrk's -t.
local op = os.getenv("BENCH_OP")
local key = os.getenv("BENCH_KEY")
local run = os.getenv("BENCH_RUN")
local buyers = tonumber(os.getenv("BENCH_BUYERS"))
local threads = tonumber(os.getenv("BENCH_THREADS"))

local counter = 1
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end

local jobs = {}
local n = 0
local auth = "Bearer " .. key

function init(args)
  if op == "release" then
    -- Each thread releases its own share of the funded jobs, each once.
    local i = 0
    for line in io.lines(os.getenv("BENCH_JOBS")) do
      if i % threads == tid - 1 then
        jobs[#jobs + 1] = line
      end
      i = i + 1
    end
  end
end

function request()
  n = n + 1
  local headers = { ["Authorization"] = auth }
  if op == "fund" then
    local job = run .. "-" .. tid .. "-" .. n
    headers["Content-Type"] = "application/json"
    headers["Idempotency-Key"] = "fund-" .. job
    -- Workers in another order than buyers: a release credits its worker's account row,
    -- and one worker for every job would make all releases queue on that row.
    -- Each thread starts its turn of buyers at its own offset: threads counting in step
    -- would fund the same buyer at the same instant (and their jobs, stored side by side,
    -- would be released side by side), queueing on its account row far more often than
    -- clients of many buyers do.
    local buyer = (n + math.floor((tid - 1) * buyers / threads)) % buyers
    local body = '{"job_id":"' .. job .. '","buyer":"buyer-' .. buyer
      .. '","worker":"worker-' .. ((n * 7 + tid) % buyers)
      .. '","asset":"USDC","amount":"0.01"}'
    return wrk.format("POST", "/v1/escrows", headers, body)
  elseif op == "release" then
    -- Past the end of the list a thread replays its releases: counted by the bench.
    local job = jobs[((n - 1) % #jobs) + 1]
    headers["Idempotency-Key"] = "release-" .. job
    return wrk.format("POST", "/v1/escrows/" .. job .. "/release", headers, nil)
  elseif op == "balances" then
    return wrk.format("GET", "/v1/agents/buyer-" .. (n % buyers) .. "/balances", headers, nil)
  else
    return wrk.format("GET", "/v1/deposits?limit=50", headers, nil)
  end
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, '
      .. '"p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, errors.status,
    errors.connect + errors.read + errors.write + errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
