local id = redis.call('XADD', KEYS[2], '*', 'd', ARGV[1])
local gone = {}
local excess = math.min(redis.call('XLEN', KEYS[2]) - tonumber(ARGV[3]), 1000)
if excess > 0 then
  for _, e in ipairs(redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', excess)) do
    gone[#gone + 1] = e[1]
  end
end
local now = redis.call('TIME')
local oldest = (tonumber(now[1]) - tonumber(ARGV[4])) * 1000
if oldest > 0 then
  local before = string.format('(%d-0', oldest)
  for _, e in ipairs(redis.call('XRANGE', KEYS[2], '-', before, 'COUNT', 1000)) do
    gone[#gone + 1] = e[1]
  end
end
if #gone > 0 then
  redis.call('XDEL', KEYS[2], unpack(gone))
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
redis.call(ARGV[6], ARGV[5], id)
redis.call(ARGV[6], KEYS[1], ARGV[1])
return id
