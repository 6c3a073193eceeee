-- wrk script (phaul.testing.services.Wrk): requests each file in turn, compares every
-- body received with the files' bytes, and prints one JSON line of figures at the end.
-- Arguments: URL-PATH LOCAL-FILE [URL-PATH LOCAL-FILE ...]
local paths, bodies, threads = {}, {}, {}
local n = 0
mismatched = 0 -- a global: done() reads it from each thread

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   for i = 1, #args, 2 do
      local f = assert(io.open(args[i + 1], "rb"))
      paths[#paths + 1] = args[i]
      bodies[#paths] = f:read("*a")
      f:close()
   end
end

function request()
   n = n % #paths + 1
   return wrk.format("GET", paths[n])
end

-- Which request an answer belongs to is not known here (several connections per
-- thread), so a body is right when it is exactly one of the files (all differ in size).
function response(status, headers, body)
   if status == 200 then
      for i = 1, #bodies do
         if body == bodies[i] then return end
      end
   end
   mismatched = mismatched + 1
end

function done(summary, latency, requests)
   local bad = 0
   for _, t in ipairs(threads) do bad = bad + t:get("mismatched") end
   local e = summary.errors
   io.write(string.format(
      '{"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, "write": %d, "status": %d, ' ..
      '"timeout": %d, "mismatched": %d, "latency_max_us": %d, "latency_mean_us": %.1f, "latency_p99_us": %d}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout, bad,
      latency.max, latency.mean, latency:percentile(99)))
end
